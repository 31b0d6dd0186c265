"""How good are the outputs: metrics on held-out scenes, the caption -> image checker, the
`quality.json` table (fourm-quickstart) and the single-task specialists it is compared with
(fourm.bench.specialists)."""
