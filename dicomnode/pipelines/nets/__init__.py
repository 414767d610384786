"""Network definitions (torch modules) of the learned pipelines; imported only by workers."""
