"""Offline training of ReFusion models: the trainer (trainer.py), the code corpus (corpus.py), synthetic
chat and tool-call pairs (chat_data.py) and tokenizer building (tokenizer_build.py).

Nothing in the serving path (scheduler/, decoding/, workers/, integrations/ apart from the
`refusion train` command) imports this package; tests/training/test_package_boundary.py holds that.
"""
