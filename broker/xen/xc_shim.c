#include "broker/xen/xc_shim.h"

#include <errno.h>
#include <stdlib.h>
#include <xenctrl.h>
#include <xentoollog.h>

struct qb_xc {
  xc_interface* xch;
  xentoollog_logger_stdiostream* logger;
};

struct qb_xc* qb_xc_open(void) {
  struct qb_xc* xc = calloc(1, sizeof *xc);
  if (xc == NULL) return NULL;
  /* The library logs its own "Could not obtain handle" at error level: the broker reports it. */
  xc->logger = xtl_createlogger_stdiostream(stderr, XTL_CRITICAL, 0);
  xc->xch = xc_interface_open((xentoollog_logger*)xc->logger, NULL, 0);
  if (xc->xch == NULL) {
    int saved = errno;
    if (xc->logger != NULL) xtl_logger_destroy((xentoollog_logger*)xc->logger);
    free(xc);
    errno = saved != 0 ? saved : ENOENT;
    return NULL;
  }
  return xc;
}

void qb_xc_close(struct qb_xc* xc) {
  if (xc == NULL) return;
  xc_interface_close(xc->xch);
  if (xc->logger != NULL) xtl_logger_destroy((xentoollog_logger*)xc->logger);
  free(xc);
}

int qb_xc_list(struct qb_xc* xc, uint32_t first, struct qb_xc_domain* out, unsigned max) {
  xc_domaininfo_t* info = calloc(max == 0 ? 1 : max, sizeof *info);
  if (info == NULL) return -1;
  int n = xc_domain_getinfolist(xc->xch, first, max, info);
  for (int i = 0; i < n; ++i) {
    out[i].domid = info[i].domain;
    out[i].dying = (info[i].flags & XEN_DOMINF_dying) != 0;
    out[i].shutdown = (info[i].flags & XEN_DOMINF_shutdown) != 0;
  }
  int saved = errno;
  free(info);
  errno = saved;
  return n;
}
