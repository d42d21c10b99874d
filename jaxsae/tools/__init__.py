"""Tools that build what jaxsae ships (the demo LM and its tokenizer); not used by a run."""
