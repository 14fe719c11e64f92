/* exitcode: exits through the debug-exit port with the code given by exit=N (0..255). */
#include "kit/kit.h"

int guest_main(void)
{
    bool bad;
    if (!kit_cmdline_value("exit", NULL)) {
        kit_printf("exitcode: FAIL missing exit=N on the command line\n");
        return KIT_EXIT_CMDLINE;
    }
    u64 code = kit_cmdline_u64("exit", 0, &bad);
    if (bad || code > 255) {
        kit_printf("exitcode: FAIL bad exit= value (want 0..255)\n");
        return KIT_EXIT_CMDLINE;
    }
    kit_printf("exitcode: exiting with %lu\n", code);
    return (int)code;
}
