/* ext/conv.pyx: no contraction of a*b + c into fused multiply-adds anywhere in the module.
   The prefill kernel (vectorised over channels) and the decode step (one channel at a time)
   must round every tap's product and sum alike, so that decoding token by token gives the
   bits of one prefill call; GCC contracts the two loop shapes differently.  The kernel is
   bound by memory traffic, so separate multiplies and adds cost nothing measurable. */
#ifndef STATESCAN_CONV_H
#define STATESCAN_CONV_H
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize ("fp-contract=off")
#endif
#endif
