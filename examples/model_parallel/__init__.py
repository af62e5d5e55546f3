"""Model parallelism: a two-stage model on two workers, trained from a driver (README.md,
"Model parallelism: a complete example")."""
