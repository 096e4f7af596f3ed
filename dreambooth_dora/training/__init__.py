"""DreamBooth training: the config, image intake, prior-preservation images, the objective, checkpoints and the loop."""
