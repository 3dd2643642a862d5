"""The Gradio playground: `ui` (layout + events), `render` (frames -> HTML / plotly), `backend` (owns models)."""
