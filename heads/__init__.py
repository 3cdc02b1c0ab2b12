"""heads: small classifiers trained from an embstore store, swept over layers and heads."""
