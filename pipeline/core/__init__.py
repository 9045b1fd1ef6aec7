"""What every stage shares: the recipe, the run directory, loading and saving models with their notices, tracking,
generating and scoring, and the pure math. Nothing here imports a stage (``pipeline/__init__.py`` has the picture)."""
