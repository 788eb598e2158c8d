"""The web dashboard at ``/ui``: server-rendered pages on the services the REST API uses."""
