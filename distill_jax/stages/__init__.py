"""One module per pipeline stage (prepare, evaluate, switch, label, distill, report)."""
