"""Embedding parity with open_clip: max |difference| of image and text embeddings.

Runs in the open_clip environment (scripts/setup_openclip_env.sh):

    .venv-openclip/bin/python benchmarks/clip_openclip_parity.py
"""
import torch, open_clip
from cvformers.models.clip import OPENAI_MEAN, OPENAI_STD, load_openai_state_dict
torch.set_num_threads(1); torch.manual_seed(0)
for name, qg in (("ViT-B-32", False), ("ViT-B-32-quickgelu", True)):
    ref = open_clip.create_model(name, pretrained=None).eval()
    m = load_openai_state_dict(ref.state_dict(), quick_gelu=qg)
    x = torch.rand(2, 3, 224, 224)
    mean, std = torch.tensor(OPENAI_MEAN).view(1,3,1,1), torch.tensor(OPENAI_STD).view(1,3,1,1)
    t = open_clip.get_tokenizer(name)(["a photo of a cat.", "a red circle above a blue square"])
    with torch.no_grad():
        di = (m.encode_image(x) - ref.encode_image((x-mean)/std)).abs().max().item()
        dt = (m.encode_text(t) - ref.encode_text(t)).abs().max().item()
        mag = ref.encode_image((x-mean)/std).abs().max().item()
    print(name, "quick_gelu", qg, "max|img diff|", f"{di:.2e}", "max|txt diff|", f"{dt:.2e}", "max|img emb|", f"{mag:.2f}")
