"""Start the dlm-studio playground from a checkout: python app.py [options] (= the `dlm-studio` command)."""
from app.launch import main

if __name__ == "__main__":
    main()
