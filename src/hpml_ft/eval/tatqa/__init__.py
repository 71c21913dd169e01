"""TAT-QA evaluation: the official scorer's semantics (`metric`, `normalize`) and the derivation executor
(`executor`). The data side (rendering TAT-QA for training, derivation targets) is `hpml_ft.tatqa_data` and
`hpml_ft.tatqa_target`."""
