"""Start the dlm-studio playground from a checkout: python app.py [options] (= the `dlm-studio` command)."""
from app.launch import main, parse_args  # noqa: F401  (parse_args: the flags, for scripts and tests)

if __name__ == "__main__":
    main()
