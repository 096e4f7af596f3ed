"""The browser app: background training jobs and the tabs of app.py."""
