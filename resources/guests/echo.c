/* echo: reads one line from COM1 (polling LSR bit 0) and prints "echo: <line>", exits 0. */
#include "kit/kit.h"

int guest_main(void)
{
    char line[256];
    size_t n = 0;
    kit_printf("echo: ready\n");
    for (;;) {
        int c = kit_serial_getc();
        if (c == '\n' || c == '\r')
            break;
        if (n + 1 < sizeof(line))
            line[n++] = (char)c;
    }
    line[n] = 0;
    kit_printf("echo: %s\n", line);
    return 0;
}
