"""The deliverables of a run, drawn on the laptop from its pulled outputs: the report's figures,
the comparison of runs, predictions with the trained model."""
