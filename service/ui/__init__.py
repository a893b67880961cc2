"""The web dashboard and the offline API docs, served by the API itself (see ``routes``)."""
