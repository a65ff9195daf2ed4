/* The few libxenctrl calls the broker makes, behind a C interface: xenctrl.h does not compile as
   strict C++20 (anonymous structs in xen/hvm/save.h) and has no extern "C" guards. */
#ifndef QB_XEN_XC_SHIM_H
#define QB_XEN_XC_SHIM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct qb_xc;

/* Opens the hypervisor's control interface with a logger that reports only critical messages.
   NULL with errno set when there is none (ENOENT without /dev/xen/privcmd). */
struct qb_xc* qb_xc_open(void);
void qb_xc_close(struct qb_xc* xc);

struct qb_xc_domain {
  uint32_t domid;
  int dying;
  int shutdown;
};

/* Lists up to `max` domains from domid `first` on. The count, or -1 with errno set. */
int qb_xc_list(struct qb_xc* xc, uint32_t first, struct qb_xc_domain* out, unsigned max);

#ifdef __cplusplus
}
#endif

#endif
