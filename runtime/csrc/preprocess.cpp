// placeholder, replaced by the preprocessing implementation
