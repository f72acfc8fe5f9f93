"""Add ICECallback to an existing, plain Lightning training script.

Your module keeps its own code; it only has to hold the diffusers components as attributes (or a
`pipeline` attribute). Here: a UNet trained on text-conditioned denoising, with MiniLM as text encoder.

    python examples/plain_lightning_callback.py --epochs 2
"""

import argparse
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything

from ice_lightning import CaptionFolderDataModule, ICECallback
from ice_lightning.demos.tiny import build_tiny_pipeline


class MyDiffusionModule(LightningModule):
    """Your existing module: a UNet, a frozen tokenizer and text encoder, your own loss."""

    def __init__(self) -> None:
        super().__init__()
        pipe = build_tiny_pipeline("sd-minilm")  # in real life: StableDiffusionPipeline.from_pretrained(...)
        self.unet, self.vae, self.scheduler = pipe.unet, pipe.vae, pipe.scheduler
        self.tokenizer, self.text_encoder = pipe.tokenizer, pipe.text_encoder
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        ids = self.tokenizer(
            batch["captions"], padding="max_length", max_length=32, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        with torch.no_grad():
            states = self.text_encoder(ids)[0]
            latents = self.vae.encode(batch["pixel_values"]).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), device=self.device)
        pred = self.unet(self.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=states).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.unet.parameters(), lr=3e-4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    seed_everything(0)
    data = CaptionFolderDataModule(str(Path(__file__).parent / "data" / "tiny_images"), resolution=16, batch_size=4)
    ice = ICECallback(erase=["Van Gogh"], family="style", every_n_epochs=1)  # the one added line
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[ice],
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(MyDiffusionModule(), datamodule=data)
    for a in ice.applications:
        print(
            f"{a['reason']:>10}  epoch {a['epoch']}  erasure {a['metrics']['erasure']:.3f}  "
            f"collateral {a['metrics']['collateral_far']:.3f}"
        )


if __name__ == "__main__":
    main()
