"""The run console (``/ui/``): its routes, the pure views it draws, its static page."""
