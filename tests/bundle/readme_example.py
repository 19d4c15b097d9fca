"""README "Use the components in your own MONAI pipeline": the example, runnable as it stands.

Kept verbatim in README.md between the markers below; tests/bundle/test_readme_example.py runs
this file and checks its numbers. Run it yourself with ``python tests/bundle/readme_example.py``.
"""

# --- README example begins ---
import torch
from monai.transforms import Compose
from monai.utils import set_determinism

from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.data import load_pair_datalist
from monai_cidir.data.phantom import make_breathing_phantom
from monai_cidir.losses import RegistrationLoss
from monai_cidir.metrics import TargetRegistrationError
from monai_cidir.networks import ConditionedINR
from monai_cidir.transforms import LoadRegistrationPaird, LungMaskd, RandPointsInMaskd

set_determinism(seed=0)

# A small synthetic pair (any {"fixed_image": ..., "moving_image": ...} record works the same).
record = load_pair_datalist(make_breathing_phantom("example_data", shape=(48, 48, 32), num_landmarks=50))[0]
record = {k: v for k, v in record.items() if not k.endswith("_mask")}  # let LungMaskd segment

# Plain MONAI Compose: load the pair (world RAS mm affines), segment the lungs, draw points in the mask.
preprocess = Compose([LoadRegistrationPaird(), LungMaskd(keys="fixed_image", backend="threshold")])
item = preprocess(record)
draw_points = RandPointsInMaskd(keys="fixed_mask", num_points=1000)
draw_points.set_random_state(seed=0)

fixed_grid = CoordinateMapping.from_image(item["fixed_image"])  # defines the network's frame
moving_grid = CoordinateMapping.from_image(item["moving_image"])
net = ConditionedINR()  # u(x, alpha), alpha-conditioned SIREN
optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
loss_fn = RegistrationLoss("bending")  # -NCC + alpha * 3e3 * bending energy (lambda(alpha) is the loss's)

for step in range(60):
    points = draw_points(item)["points"]  # (N, 3) world mm inside the fixed lung mask
    alpha = torch.rand(1)  # the regularisation weight, drawn from the prior U[0, 1]
    u, jac, hess = net.forward_with_derivatives(fixed_grid.world_to_normalized(points), alpha)
    moved = points + fixed_grid.displacement_to_world(u)  # fixed point -> moving space (mm)
    terms = loss_fn(
        fixed_grid.sample(item["fixed_image"], points),
        moving_grid.sample(item["moving_image"], moved),
        fixed_grid.jacobian_to_world(jac),
        fixed_grid.hessian_to_world(hess),
        alpha,
    )  # {"loss", "similarity", "regularization", "reg_bending"}
    loss = terms["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

# Pick any alpha after training, no retraining: e.g. alpha = 0.2; TRE of the landmarks (mm).
with torch.no_grad():
    lm = item["fixed_landmarks"].float()
    pushed = lm + fixed_grid.displacement_to_world(net(fixed_grid.world_to_normalized(lm), 0.2))
tre = TargetRegistrationError()
tre_before = float(tre(item["fixed_landmarks"][None], item["moving_landmarks"][None]).mean())
tre_after = float(tre(pushed.double()[None], item["moving_landmarks"][None]).mean())
print(f"TRE {tre_before:.2f} mm -> {tre_after:.2f} mm")
# --- README example ends ---
