"""The demo registry folder: `python -m models.build` trains the demo models into it
(the training code is serving.demo)."""
