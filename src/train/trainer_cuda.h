// train/trainer_cuda.h: registers the CUDA model (model/qwen3_moe_cuda.h) as the trainer's
// train.device cuda (train/trainer.h, DeviceTrainModel). Only in builds with CUDA
// (automoe_cuda_model); binaries call it once before run_finetune.
#pragma once

namespace automoe {

void register_cuda_trainer();

}  // namespace automoe
