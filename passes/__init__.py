"""Graph -> graph compiler passes over torch.fx graphs (issue 3). Empty for now."""

