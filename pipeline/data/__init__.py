"""The data phase: acquire a labelled image dataset, check it, and prepare its splits."""
