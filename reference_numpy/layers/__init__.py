"""Reference layers: each a ``*_forward`` / ``*_backward`` pair of free functions."""
