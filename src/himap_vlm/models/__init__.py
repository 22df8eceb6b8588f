"""Model builders: tiny random models for tests and examples, and the models the package ships."""
