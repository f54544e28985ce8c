/* The running CPU's L1 data cache, for blocking that keeps a slice of a packed panel in L1
 * (rnn.pyx's projection).  Linux: sysfs of cpu0, the level-1 cache of type Data or Unified;
 * elsewhere, or unreadable: 0 ("unknown"), and the callers keep their smaller default. */
#ifndef STATESCAN_CACHE_SIZE_H
#define STATESCAN_CACHE_SIZE_H

#include <stdio.h>
#include <string.h>

static long ss_l1d_bytes(void) {
#if defined(__linux__)
    char path[96], kind[32];
    for (int index = 0; index < 8; index++) {
        int level = 0;
        long size = 0;
        char unit = 0;
        FILE* f;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/level", index);
        if (!(f = fopen(path, "r")))
            break;
        if (fscanf(f, "%d", &level) != 1) level = 0;
        fclose(f);
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/type", index);
        if (level != 1 || !(f = fopen(path, "r")))
            continue;
        if (fscanf(f, "%31s", kind) != 1) kind[0] = 0;
        fclose(f);
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", index);
        if ((strcmp(kind, "Data") && strcmp(kind, "Unified")) || !(f = fopen(path, "r")))
            continue;
        if (fscanf(f, "%ld%c", &size, &unit) < 1) size = 0;
        fclose(f);
        return unit == 'K' ? size << 10 : unit == 'M' ? size << 20 : size;
    }
#endif
    return 0;
}

#endif
