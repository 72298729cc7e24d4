"""newsletter: feeds in, email digests and share snippets out."""

__version__ = "0.1.0"
