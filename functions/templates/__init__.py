"""Function templates of `torpor new` (package data; see README.md here)."""
