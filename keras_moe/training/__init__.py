"""Training procedures of the papers (phases) and callbacks for monitoring MoE models."""
