"""One router per resource, all under /api/1."""
