"""Before paying for a job: ``estimate`` (no request) and ``pilot`` (a sample, projected)."""
