"""The composite objective and the LM-head statistics back ends."""
