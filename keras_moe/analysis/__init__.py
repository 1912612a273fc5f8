"""Analysis of trained MoE models: expert activation rates, gating heatmaps, FLOPs."""
