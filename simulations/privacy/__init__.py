"""Privacy evaluation: membership inference against the trained global model and the
privacy-utility sweep."""
