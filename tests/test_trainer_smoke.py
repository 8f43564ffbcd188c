import torch
from conftest import LossRecorder, make_trainer, tiny_model


def test_fit_and_resume_same_losses(digits_mds, tmp_path):
    rec = LossRecorder()
    make_trainer(digits_mds, max_duration='8ba', callbacks=[rec]).fit()
    full = rec.losses
    assert len(full) == 8 and all(torch.isfinite(torch.tensor(full)))

    save = str(tmp_path / 'ckpt')
    rec1 = LossRecorder()
    make_trainer(
        digits_mds,
        max_duration='8ba',
        callbacks=[rec1],
        save_folder=save,
        save_interval='4ba',
        save_filename='ba{batch}.pt',
    ).fit()
    rec2 = LossRecorder()
    # A new model with another seed: everything must come from the checkpoint.
    make_trainer(
        digits_mds, max_duration='8ba', callbacks=[rec2], model=tiny_model(seed=99), load_path=f'{save}/ba4.pt'
    ).fit()
    assert rec1.losses == full
    assert rec2.losses == full[4:]


def test_dropout_resumes_exactly(digits_mds, tmp_path):
    """Dropout draws from the global RNG, which Composer does not restore mid-epoch: the model seeds it itself."""
    from composer_algos.diffusion import DiffusionModel, NoiseSchedule, build_unet

    def unet_model(seed: int) -> DiffusionModel:
        torch.manual_seed(seed)
        return DiffusionModel(
            build_unet(block_out_channels=(16, 32), norm_num_groups=8, dropout=0.3),
            NoiseSchedule('linear', 100),
            seed=seed,
        )

    save = str(tmp_path / 'ckpt')
    full = LossRecorder()
    make_trainer(
        digits_mds,
        max_duration='6ba',
        callbacks=[full],
        model=unet_model(17),
        save_folder=save,
        save_interval='3ba',
        save_filename='ba{batch}.pt',
    ).fit()
    resumed = LossRecorder()
    make_trainer(
        digits_mds, max_duration='6ba', callbacks=[resumed], model=unet_model(99), load_path=f'{save}/ba3.pt'
    ).fit()
    assert len(full.losses) == 6
    assert resumed.losses == full.losses[3:]
