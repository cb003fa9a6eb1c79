"""The ttrpc events service."""
