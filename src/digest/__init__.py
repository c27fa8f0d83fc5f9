"""digest: an author's new essays and the best reader comments, as an approved email digest."""

__version__ = "0.1.0"
