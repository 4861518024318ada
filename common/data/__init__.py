"""Data sources and formats shared by sites and the coordinator."""
