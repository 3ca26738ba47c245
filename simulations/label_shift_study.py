"""S12 of docs/personalization.md, a refuted recipe kept measurable: class-mix-compensated BatchNorm
recalibration. The vendor records each BatchNorm channel's mean and second moment per class; the
device estimates its class mix pi (pseudo-labels of a safe recalibration, of the input side's,
of the base, hard or soft, one EM step, and the true mix as an oracle) and moves each channel only
by what that mix does not predict: running mean m_u + a (mu_b - m_pi), variance a^2 var_b, with
a^2 = var_u / var_pi (an affine shift per channel). Per user, before pruning, beside full, the
class-spread (safe) and the input side's recalibration, with the base's layer and T3A's
prototypes (held-out labels score only); one JSON line per user.

    python -m simulations.label_shift_study digits,digits-style,resnet-few,resnet18-64 \
        --fsdd ../shared/data/fsdd --resnet64 runs/resnet_users64/base.pt > runs/label_shift.jsonl
"""
import argparse
import copy
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from common.cli import first_sentence
from common.data import protocol as P
from common.data import readers as D
from common.engine.adapt import AGREE, KAPPA, SLACK, class_sums, classes_predicted, spread_for, stem_profile
from common.engine.bn import bn_layers, bn_prior, recalibrate_bn
from common.engine.forward import features_and_logits
from common.engine.heads import HEADS as HEAD_REGISTRY
from server.pretrain import training_split
from simulations import bench_tasks as BT
from simulations.adapt_study import cohorts, resnet64_users


def class_moments(model, x, y):
    """Per BatchNorm layer: each class's mean and mean square per channel (the vendor's data)."""
    return [(s1 / c[:, None].clamp_min(1), s2 / c[:, None].clamp_min(1)) for s1, s2, c in class_sums(model, x, y)]


@torch.no_grad()
def mixcomp(model, x, moments, pi, prior, amin=0.0):
    bns = bn_layers(model)
    def make(m, mom, pr):
        mu_k, sq_k = mom; mu_b, var_b = pr
        m_pi = pi @ mu_k; var_pi = (pi @ sq_k - m_pi**2).clamp_min(1e-5)
        def fwd(h):
            _, mean, invstd = torch.native_batch_norm(h, m.weight, m.bias, None, None, True, 0.0, m.eps)
            var = (invstd.pow(-2) - m.eps).clamp_min(0)
            n = h.numel() // h.shape[1]; var = var * n / max(n-1, 1)
            a = (var / var_pi).sqrt()
            rm = mean + a * (mu_b - m_pi); rv = a**2 * var_b
            m.running_mean.copy_(rm); m.running_var.copy_(rv)
            return F.batch_norm(h, rm, rv, m.weight, m.bias, False, 0.0, m.eps)
        return fwd
    for m, mom, pr in zip(bns, moments, prior):
        m.forward = make(m, mom, pr)
    try:
        lg = model(x)
    finally:
        for m in bns: del m.forward
    model.eval()
    return lg

def vendor_data(cohort, uid, fsdd, cache={}):
    if cohort in ("digits", "digits-style", "resnet-few"):
        ds = D.load_digits()
        if cohort == "resnet-few":
            v, _ = P.vendor_and_pool("digits", ds, 0)
            return BT.resnet_input(ds.x[v]).repeat(1, 3, 1, 1), ds.y[v]
        tr, _ = training_split("digits", ds, 0, 0.5); tr = torch.as_tensor(tr)
        return ds.x[tr], ds.y[tr]
    ds = cache.setdefault("fsdd", D.load_fsdd(fsdd))
    if cohort in ("fsdd-seen", "fsdd-cond"):
        tr, _ = training_split("fsdd", ds, 0, 0.5, None, P.seen_speaker_split(ds))
    else:
        tr, _ = training_split("fsdd", ds, 0, 0.5, uid.split(":")[0])
    tr = torch.as_tensor(tr)
    return ds.x[tr], ds.y[tr]

def run_user(cohort, base, meta, u, vx, vy, mom_cache):
    key = id(base)
    if key not in mom_cache:
        mom_cache[key] = class_moments(base, vx, vy)
        c = torch.bincount(vy, minlength=mom_cache[key][0][0].shape[0]).float(); mom_cache[(key, "pi0")] = c / c.sum()
    mom = mom_cache[key]
    prior = bn_prior(base); spread = spread_for(base, meta)
    acc = lambda lg: (lg.argmax(1) == u.heldout_y).float().mean().item()
    out = {}
    def heads(name, m):
        m.eval()
        fu, lu, last = features_and_logits(m, u.x)
        fh, lh, _ = features_and_logits(m, u.heldout_x)
        out[name + "/lin"] = acc(lh)
        h = copy.deepcopy(last); HEAD_REGISTRY["prototypes"].write(h, fu, lu); out[name + "/t3a"] = acc(h(fh))
        return lu
    b = copy.deepcopy(base).eval(); heads("base", b)
    f = copy.deepcopy(base); recalibrate_bn(f, u.x, 256); lf = heads("full", f)
    s = copy.deepcopy(base); recalibrate_bn(s, u.x, 256, prior=prior, spread=spread, kappa=KAPPA); ls = heads("safe", s)
    st = copy.deepcopy(base); recalibrate_bn(st, u.x, 256, prior=prior, profile=stem_profile(st), spread=spread, kappa=KAPPA); lst = heads("stem", st)
    agree = float((lf.argmax(1) == ls.argmax(1)).float().mean())
    auto = "full" if classes_predicted(lf) <= classes_predicted(ls) + SLACK and agree >= AGREE else "stem"
    out["auto/t3a"] = out[auto + "/t3a"]; out["auto/lin"] = out[auto + "/lin"]
    K = mom[0][0].shape[0]
    for src, lsrc in (("safe", ls), ("stem", lst), ("base", None)):
        if lsrc is None:
            lsrc = base.eval()(u.x)
        pi_h = torch.bincount(lsrc.argmax(1), minlength=K).float(); pi_h /= pi_h.sum()
        pi_s = F.softmax(lsrc, 1).mean(0)
        for pn, pi in (("hard", pi_h), ("soft", pi_s)):
            m = copy.deepcopy(base); mixcomp(m, u.x, mom, pi, prior); lm = heads(f"mix-{src}-{pn}", m)
            if src == "stem" and pn == "hard":  # one EM step
                out["a_fm"] = float((lf.argmax(1) == lm.argmax(1)).float().mean())
                pi2 = torch.bincount(lm.argmax(1), minlength=K).float(); pi2 /= pi2.sum()
                m2 = copy.deepcopy(base); mixcomp(m2, u.x, mom, pi2, prior); heads("mix-em", m2)
    # oracle pi
    pi_o = torch.bincount(u.heldout_y, minlength=K).float(); pi_o /= pi_o.sum()
    m = copy.deepcopy(base); mixcomp(m, u.x, mom, pi_o, prior); heads("mix-oracle", m)
    out["auto"] = auto; out["a_fs"] = agree; out["k_full"] = classes_predicted(lf); out["k_safe"] = classes_predicted(ls)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=first_sentence(__doc__))
    p.add_argument("cohorts", help="comma-separated: the bench's cohorts and resnet18-64")
    p.add_argument("--fsdd", default="../shared/data/fsdd")
    p.add_argument("--resnet64", default="runs/resnet_users64/base.pt",
                   help="the base.pt of simulations/resnet_users.py --size 64")
    p.add_argument("--study-dir", default="runs/study", help="where adapt_study cached the cohorts' bases")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    moments = {}
    for name in a.cohorts.split(","):
        if name == "resnet18-64":
            users = resnet64_users(a.resnet64)
            size = users[0][1]["features"]["image_size"]
            ds = D.load_digits()
            tr = torch.as_tensor(P.vendor_train_test("digits", ds, 0)[0])
            vx = F.interpolate(ds.x[tr], size=size, mode="bilinear").repeat(1, 3, 1, 1)
            found = [(name, users, (vx, ds.y[tr]))]
        else:
            found = [(c, us, None) for c, us in cohorts(Path(a.study_dir), a.fsdd, [name])]
        for cname, users, vendor in found:
            for base, meta, u in users:
                vx, vy = vendor or vendor_data(cname, u.user_id, a.fsdd)
                r = run_user(cname, base, meta, u, vx, vy, moments)
                r.update(cohort=cname, user=u.user_id, n=len(u.x))
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    main()
