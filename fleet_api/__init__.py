"""Fleet's HTTP side: the Flask app factory, REST resources, metrics and the CLI."""
