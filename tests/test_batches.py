import torch

from ldm_app.batches import StreamingBatches
from ldm_app.config import load_config
from ldm_app.data import load_image_dataset
from ldm_app.encoders import Encoders
from ldm_app.testing import tiny_components, write_toy_dataset


def test_streaming_resume_with_undecodable_images_sees_the_same_examples(tmp_path):
    write_toy_dataset(tmp_path, n=6, corrupt=3)
    cfg = load_config(None, [f"data.path={tmp_path}", "data.resolution=32", "data.streaming=true", "train.cache=false",
                             "data.random_flip=true"]).data
    c = tiny_components()

    def batches() -> StreamingBatches:
        return StreamingBatches(load_image_dataset(cfg), cfg, 0, 0, 1, Encoders(c["vae"], c["tokenizer"], c["text_encoder"]))

    straight, resumed = batches(), batches()
    expected = [straight(step, 2, 0, 1) for step in range(6)]  # 12 examples: two passes over the 6 good images
    assert straight.skipped >= 3  # the 3 bad files, once per pass (the second may end before some)
    for step in (3, 4, 5):  # a run resumed at micro-step 3
        got = resumed(step, 2, 0, 1)
        torch.testing.assert_close(got.mean, expected[step].mean)
        torch.testing.assert_close(got.context, expected[step].context)
