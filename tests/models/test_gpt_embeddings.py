"""Whether the GPT models' embeddings train is decided in one place (`models.gpt.embeddings_frozen`) from the
data's tokenizer: frozen for GPT-1's BPE (the paper's frozen pretrained embeddings), trained for a tokenizer of
the data's own, unless `model.freeze_embeddings` says otherwise."""
import pytest

from fisherbench.models import create_model
from fisherbench.models.gpt import embeddings_frozen


def trains_embeddings(model) -> bool:
    return model.embedding.tokens.weight.requires_grad and model.embedding.position.weight.requires_grad


@pytest.mark.parametrize("vocabulary, frozen", [("gpt1", True), (None, True), ("bpe-trained", False),
                                                ("byte", False), ("char", False), ("bpe", False)])
def test_default_follows_the_data_tokenizer(vocabulary, frozen):
    assert embeddings_frozen(None, vocabulary) is frozen
    for name in ("tiny_gpt", "gpt1_small"):
        model = create_model(name, num_classes=50, input_shape=(8,), vocabulary=vocabulary,
                             **({"d_model": 24, "heads": 2, "mlp_hidden": 32, "layers": 1} if name == "gpt1_small"
                                else {}))
        assert trains_embeddings(model) is not frozen
        assert model.classifier.weight is model.embedding.tokens.weight  # tied either way


def test_an_explicit_setting_wins():
    assert trains_embeddings(create_model("tiny_gpt", num_classes=50, input_shape=(8,), vocabulary="gpt1",
                                          freeze_embeddings=False))
    assert not trains_embeddings(create_model("tiny_gpt", num_classes=50, input_shape=(8,), vocabulary="byte",
                                              freeze_embeddings=True))


def test_builders_without_a_vocabulary_argument_are_called_as_before():
    model = create_model("small_cnn", num_classes=10, input_shape=(3, 32, 32), vocabulary="byte")
    assert sum(p.numel() for p in model.parameters()) > 0
