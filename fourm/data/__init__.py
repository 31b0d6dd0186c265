"""Data: procedural scenes (`scenes`), the aligned-folder format (`folder`), TFDS builders
(`tfds_scenes`) and pictures (`visualize`). Import the submodule you need; this package stays
light so that spawned worker processes start fast."""
