"""The Streamlit dashboard's pages, composed by app.py (the top layer: it reads through
`reports` and `tuner.record`, and writes nothing)."""
