"""Official-format checkpoints for the tests: the official arch strings and a writer of
official ``.pth`` files (state dict under the official names, cached coordinate buffers)."""
import torch

from hyperseg.checkpoint import official_state_dict

# The arch strings the official training script stores (its get_arch on each official config).
OFFICIAL_ARCH = {
    "hyperseg-m-cityscapes": "hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet('efficientnet-b1',pretrained=True,levels=2,out_feat_scale=[1.0,0.25,0.25,0.25,0.25],kernel_sizes=[1,1,1,3,3],level_channels=[64,32,16,16,16],expand_ratio=2,with_out_fc=False,decoder_dropout=None,weight_groups=[32,16,8,16,4],decoder_groups=1,inference_hflip=True,coords_res=[(512,512),(512,1024)],num_classes=19)",  # noqa: E501
    "hyperseg-s-cityscapes": "hyperseg.models.hyperseg_v1_0_unify.hyperseg_efficientnet('efficientnet-b1',pretrained=True,levels=2,out_feat_scale=[1.0,0.166,0.2,0.25,0.4],kernel_sizes=[1,1,1,3,3],level_channels=[32,16,8,8,8],expand_ratio=2,with_out_fc=False,decoder_dropout=None,weight_groups=[32,16,8,16,4],decoder_groups=1,inference_hflip=True,unify_level=4,coords_res=[(768,768),(768,1536)],num_classes=19)",  # noqa: E501
    "hyperseg-s-camvid": "hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet('efficientnet-b1',pretrained=True,levels=2,kernel_sizes=(1,1,1,3,3),level_channels=[64,32,16,16,16],expand_ratio=2,inference_hflip=True,with_out_fc=False,decoder_dropout=None,weight_groups=[64,32,32,16,8],coords_res=[(576,576),(576,768)],num_classes=12)",  # noqa: E501
    "hyperseg-l-camvid": "hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet('efficientnet-b1',pretrained=True,levels=2,kernel_sizes=(1,1,1,3,3,3),level_channels=[64,32,16,16,16,16],expand_ratio=2,inference_hflip=True,with_out_fc=False,decoder_dropout=None,weight_groups=[64,32,32,16,8,8],coords_res=[(768,768),(768,1024)],num_classes=12)",  # noqa: E501
    "hyperseg-l-voc": "hyperseg.models.hyperseg_v0_1.hyperseg_efficientnet('efficientnet-b3',pretrained=True,levels=3,kernel_sizes=(1,1,3,3,3,3),expand_ratio=2,inference_hflip=True,with_out_fc=False,decoder_dropout=None,weight_groups=16,num_classes=21)",  # noqa: E501
}
CAMVID = "hyperseg-s-camvid"


def randomize_buffers(model):
    """Non-default BN statistics, so that a loader that skipped them would be caught."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("num_batches_tracked"):
                t.fill_(7)
    return model


def coordinate_buffers(coords_res, levels):
    """The cached coordinate grids the official v1 decoder registers in its state dict."""
    out = {}
    for h, w in coords_res:
        for i in range(levels):
            hh, ww = h // 2 ** i, w // 2 ** i
            xs, ys = torch.linspace(-1, 1, ww), torch.linspace(-1, 1, hh)
            out[f"decoder.coord{hh}_{ww}"] = torch.stack((xs.expand(hh, ww), ys[:, None].expand(hh, ww)))[None]
    return out


def write_official(path, model, arch=None, prefix="module.", **extra):
    state = {prefix + k: v for k, v in official_state_dict(model).items()}
    if model.config.coords_res:
        state.update(coordinate_buffers(model.config.coords_res, model.config.levels))
    payload = {"state_dict": state, "epoch": 12, "best_iou": 0.71, **extra}
    if arch is not None:
        payload["arch"] = arch
    torch.save(payload, path)
    return path


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
