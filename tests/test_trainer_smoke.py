import torch
from conftest import LossRecorder, make_trainer, tiny_model


def test_fit_and_resume_same_losses(digits_mds, tmp_path):
    rec = LossRecorder()
    make_trainer(digits_mds, max_duration='8ba', callbacks=[rec]).fit()
    full = rec.losses
    assert len(full) == 8 and all(torch.isfinite(torch.tensor(full)))

    save = str(tmp_path / 'ckpt')
    rec1 = LossRecorder()
    make_trainer(digits_mds, max_duration='8ba', callbacks=[rec1], save_folder=save, save_interval='4ba',
                 save_filename='ba{batch}.pt').fit()
    rec2 = LossRecorder()
    # A new model with another seed: everything must come from the checkpoint.
    make_trainer(digits_mds, max_duration='8ba', callbacks=[rec2], model=tiny_model(seed=99),
                 load_path=f'{save}/ba4.pt').fit()
    assert rec1.losses == full
    assert rec2.losses == full[4:]
