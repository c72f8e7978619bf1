/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The header list of enbd's own bindgen run (see Kbuild). The kernel's
 * `kernel::bindings` cannot be extended by an out-of-tree module, so enbd
 * generates bindings for exactly what it uses; static inline functions are
 * wrapped by bindgen's --wrap-static-fns into bindings_wrap.c.
 */
#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#include <linux/bvec.h>
#include <linux/capability.h>
#include <linux/errno.h>
#include <linux/file.h>
#include <linux/kthread.h>
#include <linux/net.h>
#include <linux/proc_fs.h>
#include <linux/random.h>
#include <linux/sched.h>
#include <linux/sched/mm.h>
#include <linux/sched/task.h>
#include <linux/seq_file.h>
#include <linux/socket.h>
#include <linux/tcp.h>
#include <linux/tls.h>
#include <linux/uio.h>
#include <net/sock.h>
#include <net/tcp.h>
#include "glue.h"

#ifdef __BINDGEN__
/* Values bindgen cannot evaluate from macros with casts. */
const blk_status_t ENBD_BLK_STS_OK = BLK_STS_OK;
const blk_status_t ENBD_BLK_STS_IOERR = BLK_STS_IOERR;
const blk_status_t ENBD_BLK_STS_NOTSUPP = BLK_STS_NOTSUPP;
const blk_features_t ENBD_BLK_FEAT_WRITE_CACHE = BLK_FEAT_WRITE_CACHE;
const blk_features_t ENBD_BLK_FEAT_FUA = BLK_FEAT_FUA;
const blk_features_t ENBD_BLK_FEAT_ROTATIONAL = BLK_FEAT_ROTATIONAL;
const blk_opf_t ENBD_REQ_OP_MASK = REQ_OP_MASK;
const blk_opf_t ENBD_REQ_FUA = REQ_FUA;
const blk_opf_t ENBD_REQ_NOUNMAP = REQ_NOUNMAP;
const gfp_t ENBD_GFP_NOIO = GFP_NOIO;
const gfp_t ENBD_GFP_KERNEL = GFP_KERNEL;
#endif
