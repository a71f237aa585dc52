// metal-flash-sdpa: stands in for ccv's lib/nnc/ccv_nnc.h when building only lib/nnc/mfa.
//
// At the pinned commit the MFA sources include "nnc/ccv_nnc.h" for one constant, the
// length of the batch_dims_* arrays in the params structs. The value must equal
// lib/nnc/ccv_nnc_tfb.h at the pinned commit (12), or the structs the bridge fills would
// not match the ones ccv reads; the overlay's meson.build checks this at configure time.
#ifndef METAL_FLASH_SDPA_CCV_NNC_STANDIN_H
#define METAL_FLASH_SDPA_CCV_NNC_STANDIN_H

#include <stddef.h>
#include <stdint.h>

#define CCV_NNC_MAX_DIM_ALLOC (12)

#endif
